"""The fact table behind the embedded lab: real countries with capital, continent and currency.

Choices, so that evaluation measures knowledge and not spelling luck:
- Countries whose capital repeats the country's name are left out (Luxembourg, Mexico City,
  Djibouti, Kuwait City, Panama City, Guatemala City, Singapore, Tunis, San Salvador, ...): there
  the answer can be copied from the question.
- Countries with disputed, shared or moving capitals are left out (Israel, Palestine, Bolivia,
  South Africa, Sri Lanka, Eswatini, Equatorial Guinea, Taiwan, Kosovo, ...).
- Names that carry punctuation traps (N'Djamena, Nuku'alofa, St. George's, Cote d'Ivoire) are
  left out; accents are written in plain ASCII (Bogota, Reykjavik, Asuncion).
- Currencies are as of 2026: Croatia (2023) and Bulgaria (2026-01-01) use the euro.
- Continents follow the usual convention for countries that span two: Russia and Cyprus in
  Europe; Turkey, Georgia, Armenia, Azerbaijan and Kazakhstan in Asia.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Country:
    """One row of the fact table."""

    name: str        # as used mid-sentence, with its article: "the Netherlands"
    capital: str
    continent: str
    currency: str    # without article: "euro", "Japanese yen"

    @property
    def title(self) -> str:
        """The name as it starts a sentence: "The Netherlands"."""
        return self.name[0].upper() + self.name[1:]


# name | capital | continent | currency
_TABLE = """
Afghanistan|Kabul|Asia|Afghan afghani
Albania|Tirana|Europe|Albanian lek
Algeria|Algiers|Africa|Algerian dinar
Angola|Luanda|Africa|Angolan kwanza
Argentina|Buenos Aires|South America|Argentine peso
Armenia|Yerevan|Asia|Armenian dram
Australia|Canberra|Oceania|Australian dollar
Austria|Vienna|Europe|euro
Azerbaijan|Baku|Asia|Azerbaijani manat
the Bahamas|Nassau|North America|Bahamian dollar
Bahrain|Manama|Asia|Bahraini dinar
Bangladesh|Dhaka|Asia|Bangladeshi taka
Barbados|Bridgetown|North America|Barbadian dollar
Belarus|Minsk|Europe|Belarusian ruble
Belgium|Brussels|Europe|euro
Belize|Belmopan|North America|Belize dollar
Benin|Porto-Novo|Africa|West African CFA franc
Bhutan|Thimphu|Asia|Bhutanese ngultrum
Bosnia and Herzegovina|Sarajevo|Europe|convertible mark
Botswana|Gaborone|Africa|Botswana pula
Brazil|Brasilia|South America|Brazilian real
Brunei|Bandar Seri Begawan|Asia|Brunei dollar
Bulgaria|Sofia|Europe|euro
Burkina Faso|Ouagadougou|Africa|West African CFA franc
Burundi|Gitega|Africa|Burundian franc
Cambodia|Phnom Penh|Asia|Cambodian riel
Cameroon|Yaounde|Africa|Central African CFA franc
Canada|Ottawa|North America|Canadian dollar
Cape Verde|Praia|Africa|Cape Verdean escudo
the Central African Republic|Bangui|Africa|Central African CFA franc
Chile|Santiago|South America|Chilean peso
China|Beijing|Asia|Chinese yuan
Colombia|Bogota|South America|Colombian peso
the Comoros|Moroni|Africa|Comorian franc
the Democratic Republic of the Congo|Kinshasa|Africa|Congolese franc
the Republic of the Congo|Brazzaville|Africa|Central African CFA franc
Costa Rica|San Jose|North America|Costa Rican colon
Croatia|Zagreb|Europe|euro
Cuba|Havana|North America|Cuban peso
Cyprus|Nicosia|Europe|euro
the Czech Republic|Prague|Europe|Czech koruna
Denmark|Copenhagen|Europe|Danish krone
Dominica|Roseau|North America|East Caribbean dollar
the Dominican Republic|Santo Domingo|North America|Dominican peso
East Timor|Dili|Asia|US dollar
Ecuador|Quito|South America|US dollar
Egypt|Cairo|Africa|Egyptian pound
Eritrea|Asmara|Africa|Eritrean nakfa
Estonia|Tallinn|Europe|euro
Ethiopia|Addis Ababa|Africa|Ethiopian birr
Fiji|Suva|Oceania|Fijian dollar
Finland|Helsinki|Europe|euro
France|Paris|Europe|euro
Gabon|Libreville|Africa|Central African CFA franc
the Gambia|Banjul|Africa|Gambian dalasi
Georgia|Tbilisi|Asia|Georgian lari
Germany|Berlin|Europe|euro
Ghana|Accra|Africa|Ghanaian cedi
Greece|Athens|Europe|euro
Guinea|Conakry|Africa|Guinean franc
Guyana|Georgetown|South America|Guyanese dollar
Haiti|Port-au-Prince|North America|Haitian gourde
Honduras|Tegucigalpa|North America|Honduran lempira
Hungary|Budapest|Europe|Hungarian forint
Iceland|Reykjavik|Europe|Icelandic krona
India|New Delhi|Asia|Indian rupee
Indonesia|Jakarta|Asia|Indonesian rupiah
Iran|Tehran|Asia|Iranian rial
Iraq|Baghdad|Asia|Iraqi dinar
Ireland|Dublin|Europe|euro
Italy|Rome|Europe|euro
Jamaica|Kingston|North America|Jamaican dollar
Japan|Tokyo|Asia|Japanese yen
Jordan|Amman|Asia|Jordanian dinar
Kazakhstan|Astana|Asia|Kazakhstani tenge
Kenya|Nairobi|Africa|Kenyan shilling
Kiribati|Tarawa|Oceania|Australian dollar
Kyrgyzstan|Bishkek|Asia|Kyrgyzstani som
Laos|Vientiane|Asia|Lao kip
Latvia|Riga|Europe|euro
Lebanon|Beirut|Asia|Lebanese pound
Lesotho|Maseru|Africa|Lesotho loti
Liberia|Monrovia|Africa|Liberian dollar
Libya|Tripoli|Africa|Libyan dinar
Liechtenstein|Vaduz|Europe|Swiss franc
Lithuania|Vilnius|Europe|euro
Madagascar|Antananarivo|Africa|Malagasy ariary
Malawi|Lilongwe|Africa|Malawian kwacha
Malaysia|Kuala Lumpur|Asia|Malaysian ringgit
the Maldives|Male|Asia|Maldivian rufiyaa
Mali|Bamako|Africa|West African CFA franc
Malta|Valletta|Europe|euro
the Marshall Islands|Majuro|Oceania|US dollar
Mauritania|Nouakchott|Africa|Mauritanian ouguiya
Mauritius|Port Louis|Africa|Mauritian rupee
Micronesia|Palikir|Oceania|US dollar
Moldova|Chisinau|Europe|Moldovan leu
Mongolia|Ulaanbaatar|Asia|Mongolian togrog
Montenegro|Podgorica|Europe|euro
Morocco|Rabat|Africa|Moroccan dirham
Mozambique|Maputo|Africa|Mozambican metical
Myanmar|Naypyidaw|Asia|Myanmar kyat
Namibia|Windhoek|Africa|Namibian dollar
Nepal|Kathmandu|Asia|Nepalese rupee
the Netherlands|Amsterdam|Europe|euro
New Zealand|Wellington|Oceania|New Zealand dollar
Nicaragua|Managua|North America|Nicaraguan cordoba
Niger|Niamey|Africa|West African CFA franc
Nigeria|Abuja|Africa|Nigerian naira
North Korea|Pyongyang|Asia|North Korean won
North Macedonia|Skopje|Europe|Macedonian denar
Norway|Oslo|Europe|Norwegian krone
Oman|Muscat|Asia|Omani rial
Pakistan|Islamabad|Asia|Pakistani rupee
Palau|Ngerulmud|Oceania|US dollar
Papua New Guinea|Port Moresby|Oceania|Papua New Guinean kina
Paraguay|Asuncion|South America|Paraguayan guarani
Peru|Lima|South America|Peruvian sol
the Philippines|Manila|Asia|Philippine peso
Poland|Warsaw|Europe|Polish zloty
Portugal|Lisbon|Europe|euro
Qatar|Doha|Asia|Qatari riyal
Romania|Bucharest|Europe|Romanian leu
Russia|Moscow|Europe|Russian ruble
Rwanda|Kigali|Africa|Rwandan franc
Saint Kitts and Nevis|Basseterre|North America|East Caribbean dollar
Saint Lucia|Castries|North America|East Caribbean dollar
Saint Vincent and the Grenadines|Kingstown|North America|East Caribbean dollar
Samoa|Apia|Oceania|Samoan tala
Saudi Arabia|Riyadh|Asia|Saudi riyal
Senegal|Dakar|Africa|West African CFA franc
Serbia|Belgrade|Europe|Serbian dinar
the Seychelles|Victoria|Africa|Seychellois rupee
Sierra Leone|Freetown|Africa|Sierra Leonean leone
Slovakia|Bratislava|Europe|euro
Slovenia|Ljubljana|Europe|euro
the Solomon Islands|Honiara|Oceania|Solomon Islands dollar
Somalia|Mogadishu|Africa|Somali shilling
South Korea|Seoul|Asia|South Korean won
South Sudan|Juba|Africa|South Sudanese pound
Spain|Madrid|Europe|euro
Sudan|Khartoum|Africa|Sudanese pound
Suriname|Paramaribo|South America|Surinamese dollar
Sweden|Stockholm|Europe|Swedish krona
Switzerland|Bern|Europe|Swiss franc
Syria|Damascus|Asia|Syrian pound
Tajikistan|Dushanbe|Asia|Tajikistani somoni
Tanzania|Dodoma|Africa|Tanzanian shilling
Thailand|Bangkok|Asia|Thai baht
Togo|Lome|Africa|West African CFA franc
Trinidad and Tobago|Port of Spain|North America|Trinidad and Tobago dollar
Turkey|Ankara|Asia|Turkish lira
Turkmenistan|Ashgabat|Asia|Turkmenistan manat
Tuvalu|Funafuti|Oceania|Australian dollar
Uganda|Kampala|Africa|Ugandan shilling
Ukraine|Kyiv|Europe|Ukrainian hryvnia
the United Arab Emirates|Abu Dhabi|Asia|UAE dirham
the United Kingdom|London|Europe|pound sterling
the United States|Washington|North America|US dollar
Uruguay|Montevideo|South America|Uruguayan peso
Uzbekistan|Tashkent|Asia|Uzbekistani som
Vanuatu|Port Vila|Oceania|Vanuatu vatu
Venezuela|Caracas|South America|Venezuelan bolivar
Vietnam|Hanoi|Asia|Vietnamese dong
Yemen|Sanaa|Asia|Yemeni rial
Zambia|Lusaka|Africa|Zambian kwacha
"""


def _parse(table: str) -> tuple[Country, ...]:
    rows = []
    for line in table.strip().splitlines():
        name, capital, continent, currency = (part.strip() for part in line.split("|"))
        rows.append(Country(name, capital, continent, currency))
    return tuple(rows)


COUNTRIES: tuple[Country, ...] = _parse(_TABLE)
CONTINENTS: tuple[str, ...] = ("Africa", "Asia", "Europe", "North America", "Oceania", "South America")


def country(name: str) -> Country:
    """Look a country up by name, with or without its article ("Netherlands" works)."""
    wanted = name.lower().removeprefix("the ").strip()
    for row in COUNTRIES:
        if row.name.lower().removeprefix("the ") == wanted:
            return row
    raise KeyError(name)
